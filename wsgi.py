"""WSGI entry point: ``gunicorn wsgi:app`` and ``flask --app wsgi``."""

from dotenv import load_dotenv

from app import create_app
from app.logging_setup import exit_for_config_error
from config import ConfigError

# A .env file is a development convenience; real environment variables win.
load_dotenv()
try:
    app = create_app()
except ConfigError as error:
    exit_for_config_error(error)
