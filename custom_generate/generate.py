"""Attribution-Guided Decoding (AGD) as a transformers ``custom_generate`` repository.

``model.generate(**inputs, custom_generate="<this repo>", trust_remote_code=True, roi_mask=..., k=5)``
runs transformers' own preparation (inputs, logits processors, stopping criteria, streamer) and
then AGD's decoding loop from the ``agdecode`` package; see README.md for the arguments.
"""
from agdecode.hf import generate as _agd_generate


def generate(model, *args, **kwargs):
    """transformers calls this with every argument of ``model.generate`` (less ``custom_generate``)."""
    return _agd_generate(model, *args, **kwargs)
