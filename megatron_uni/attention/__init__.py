"""The block-diffusion attention contract shared by ``model/`` and ``diffusion/``: what each
position of a model row is (``layout.py``) and which positions may attend which (``masks.py``)."""
