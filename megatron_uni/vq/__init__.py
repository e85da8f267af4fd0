"""SigLIP-VQ image tokenizer: encoder (``encoder.py``), config (``config.py``), HF weights (``weights.py``),
and the offline tokenization job (``manifest.py`` -> ``decoding.py`` -> ``job.py``) behind
``tools/tokenize_images.py``. Its output is read with ``megatron_uni.data.image_codes.ImageCodeStore``."""
