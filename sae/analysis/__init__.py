"""sae.analysis: what each latent means, from a trained SAE and the text it reads.

What lives here: `scan.py` / `topn.py` / `windows.py` / `latent_stats.py` / `top_contexts.py` / `run.py` (one pass
over a store or text keeping each latent's top-activating contexts, histograms and logit-lens tokens),
`interpret.py` with `backends.py`, `http.py`, `parsing.py`, `scoring.py` (automated labels from an LLM, local or
over HTTP, with detection scores), and `dashboard.py` + `charts.py` + `dashboard_assets/` (the static HTML
dashboard). The files it writes are documented in README.md beside this file. It may import `llama`,
`sae.activations` and the SAE itself, never `sae.steering`.
"""
