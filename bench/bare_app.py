"""The yardstick: bare Flask and psycopg2 doing one INSERT per request."""

import os
import uuid

import psycopg2
from flask import Flask, jsonify

app = Flask(__name__)
_connection = None


def connection():
    global _connection
    if _connection is None or _connection.closed:
        _connection = psycopg2.connect(os.environ["BARE_DSN"])
    return _connection


@app.post("/bare")
def bare():
    new_id = uuid.uuid4()
    conn = connection()
    with conn.cursor() as cursor:
        cursor.execute("INSERT INTO bare_hits (id, created_at) VALUES (%s, now())", (str(new_id),))
    conn.commit()
    return jsonify({"status": "success", "uuid": str(new_id)})
