"""sae.activations: text in, residual-stream activations out, and the activation store on disk.

What lives here: `inputs.py` (reading .txt/.jsonl/.parquet documents), `sentences.py` (sentence splitting),
`packing.py` (documents -> fixed-length contexts, sorted to cut padding), `capture.py` (the resumable capture job
behind scripts/capture.py), `store_format.py` / `store_writer.py` / `store.py` (the store's file layout, its
background shard writer and its shuffled batch reader) and `source.py` (`TensorSource`, the same reading
interface over an in-memory tensor, and `open_source` for `--store`). It depends on `llama/` only, never on the SAE
(`sae.model`, `sae.train`, ...): the store is the boundary between the model and the SAE.
"""
