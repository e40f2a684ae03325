"""WSGI entry point: ``gunicorn wsgi:app`` and ``flask --app wsgi``."""

from dotenv import load_dotenv

from app import create_app

# A .env file is a development convenience; real environment variables win.
load_dotenv()
app = create_app()
