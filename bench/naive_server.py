"""The baseline a tutorial reader would write: Flask, one image per request, model.predict().

Run: python bench/naive_server.py MODEL_DIR PORT. It is the yardstick of bench/run.py, not
a part of the service.
"""

import io
import json
import sys
from pathlib import Path

import keras
import numpy as np
from flask import Flask, jsonify, request
from PIL import Image

model_dir = Path(sys.argv[1])
model = keras.models.model_from_json((model_dir / "model.json").read_text())
model.load_weights(model_dir / "model.weights.h5")
labels = json.loads((model_dir / "labels.json").read_text())
height, width = model.input_shape[1:3]

app = Flask(__name__)


@app.post("/predict")
def predict():
    image = Image.open(io.BytesIO(request.get_data())).convert("RGB").resize((width, height))
    batch = np.asarray(image, dtype=np.float32)[None] / 255.0
    probabilities = model.predict(batch, verbose=0)[0]
    return jsonify(
        {"label": labels[int(np.argmax(probabilities))], "probabilities": probabilities.tolist()}
    )


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[2]), threaded=True)
