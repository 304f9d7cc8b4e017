"""llama.tiny: the recipe of the embedded tiny model (weights/tiny) and the random-weight checkpoint writer.

What lives here: `corpus.py` (the offline CPython-documentation corpus and its SentencePiece tokenizer),
`train.py` (the pretraining loop behind scripts/train_tiny_llama.py) and `random_weights.py` (streams a
random-weight HF-layout checkpoint at real shapes, for parity tests and benches). None of it is needed to run a
model; it may import `llama` (config, model, cli), never `sae`.
"""
