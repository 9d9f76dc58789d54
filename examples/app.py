"""The sam3d-hf app, ready to run as a Hugging Face Space (or here: `python examples/app.py`).

Click on a CT in the browser, see the tumour mask in three planes, correct it, download it as NIfTI. Everything lives
in `sam3d_hf.app` (`sam3d app` serves the same page); this file only reads its settings from the environment, the way
a Space passes them (Settings -> Variables):

    SAM3D_MODEL    the model: a Hub id (e.g. your `sam3d push` repo) or a folder (default ./sam3d-demo/model)
    SAM3D_ADAPTER  an adapter (Hub id or folder) to put on it, optional
    SAM3D_PRESET   processor preset, only for a model without processor_config.json

As a Space: copy this file as `app.py` and `app_requirements.txt` as `requirements.txt` into the Space repo, with a
README.md whose header holds `sdk: gradio`, `sdk_version: 6.31.0` and `app_file: app.py`. The model is loaded once,
when the Space starts, so a wrong id fails there (in the Space's log) rather than in a visitor's page.
"""

import os

from sam3d_hf.app import ModelStore, build_app

MODEL = os.environ.get("SAM3D_MODEL") or None
ADAPTER = os.environ.get("SAM3D_ADAPTER") or None
PRESET = os.environ.get("SAM3D_PRESET") or None

store = ModelStore()
if MODEL:
    store.get(MODEL, ADAPTER, PRESET)
demo = build_app(MODEL, ADAPTER, PRESET, store=store)
demo.queue(default_concurrency_limit=4)  # clicks of different visitors run side by side; each event has a queue

if __name__ == "__main__":
    demo.launch()  # a Space sets GRADIO_SERVER_NAME / GRADIO_SERVER_PORT itself
