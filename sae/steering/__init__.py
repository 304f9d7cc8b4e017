"""sae.steering: the SAE spliced into the model, steering generation with its latents, and the checks and UI on top.

What lives here: `steer.py` (`SAESplice`: x -> x_hat + error, so the unsteered model is unchanged; `Steer` and
`steered_stream`: add or clamp latents while generating), `check.py` (the measured steering check: does the
steered latent fire more, and what happens to the text) and `ui.py` + `ui.html` (the local web UI behind
scripts/steer_ui.py, served on 127.0.0.1 only). It may import `llama` and the SAE itself (`sae.model`,
`sae.formats`), and reads labels written by `sae.analysis`.
"""
