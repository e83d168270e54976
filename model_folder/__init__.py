"""The model folder contract: one writer (training/), two readers (the service and its reloader).

A model folder holds:
- `model.json`: the architecture, Keras `model.to_json()`;
- `model.weights.h5`: the weights, `model.save_weights()`;
- `labels.json`: the class names, in the order of the model's outputs;
- `metadata.json` (optional): name, version, when it was made, the input scaling, and the
  record of the training run that made it (model_folder.metadata).

A model repository (MODEL_REPOSITORY) is a folder of models, each named by its sub-folder,
which is either one model folder or a folder of numbered versions (`1/`, `2/`, ...), with an
optional `config.json` (version policy and version labels); see model_folder.repository.

This package knows no web framework and imports no Keras: file names, reading and vetting
(files), the typed metadata (metadata), version discovery and policies (repository), and
the one image preprocessing that training and serving share (preprocessing).
"""
