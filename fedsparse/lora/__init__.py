"""Sparse LoRA fine-tuning: peft adapters on a pretrained text classifier (``model.py``),
FLASC's sparse adapter communication (``flasc.py``) and SoRA's rank gates (``sora.py``)."""
