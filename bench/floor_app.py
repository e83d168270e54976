"""The web stack's floor: Flask under gunicorn gthread reading the upload, no model at all.

What any Flask + gunicorn service pays per request before it does any work of its own: the
HTTP parsing, the multipart or raw body read, and a tiny JSON answer. bench/run.py serves it
with the service's worker and thread counts and measures it in the same run as the service.
Run: python -m gunicorn -c python:bench.floor_app bench.floor_app:app
"""

from flask import Flask, jsonify, request

# gunicorn settings (this module is also its config): gthread, as the service, and no
# control socket (gunicorn >= 25 would open one in the home folder).
worker_class = "gthread"
control_socket_disable = True
accesslog = None

app = Flask(__name__)


@app.post("/predict")
def predict():
    if request.mimetype == "multipart/form-data":
        sizes = [len(part.read()) for part in request.files.values()]
    else:
        sizes = [len(request.get_data())]
    return jsonify({"images": len(sizes), "bytes": sum(sizes)})
