"""The model runtime: one folder per model family (`phi3v/`, ...), each behind the one
interface (`interface.VisionLanguageModel`) that everything above `hae_cli/model/` calls.

Shared here: the decoder walk every family runs layer by layer (`decoder.py`), the decode
loop (`generate.py`), the image file loader (`image_file.py`), finding and loading a
checkpoint by its `config.json` model_type (`loading.py`), limits and sampling options.
"""
