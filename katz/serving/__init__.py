"""The Triton models of a Katz deployment, as plain Python classes.

Each class takes its deployment (:class:`Deployment`) and maps a dict of input
tensors to a dict of output tensors; ``backends/python_katz/model.py`` only
converts Triton tensors to and from these dicts. Numeric tensors are
``torch.Tensor``; BYTES tensors are numpy object arrays.

========================  ==========================================================
model                     job
========================  ==========================================================
``preprocessing``         validate the request, tokenize, decode control images
``text_encoder``          token ids -> prompt embeddings (LoRAs on text encoders)
``katz_pipeline``         the denoising loop: hands it to ``unet`` or calls it every step
``katz_stream``           decoupled: the whole chain over BLS, one response per step
``unet``                  one UNet evaluation, or a request's whole loop (LoRAs merged in)
``controlnet``            one ControlNet evaluation -> residuals
``vae_decoder``           latents -> image in [-1, 1]
``postprocessing``        image -> uint8 [H, W, 3]
``png_encoder``           uint8 image -> PNG bytes with the settings (run only when ``png`` is asked for)
========================  ==========================================================
"""
