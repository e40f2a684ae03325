"""WSGI entry point: ``gunicorn wsgi:app`` and ``flask --app wsgi``."""

import gc

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
# What building the app allocated (routes, schemas, the OpenAPI spec, models) lives as long as
# the process: the collector need not walk it again on every full collection.
gc.freeze()
