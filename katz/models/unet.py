"""The UNet forward in two halves, for ControlNet-as-a-Service.

The ControlNet residuals are only needed after the mid block, so ``unet_down``
(time embedding, ``conv_in``, down and mid blocks) can run while the
ControlNets compute them; ``unet_up`` adds them and runs the rest. The same ops
as diffusers' ``UNet2DConditionModel.forward`` for SD 1.5 / SDXL
configurations; up-sampling sizes always come from the skips, which gives the
same result and keeps exported graphs shape-generic. Used by the PyTorch UNet
engine and by the ONNX export of the split UNet.
"""

from __future__ import annotations


def unet_down(unet, sample, timestep, encoder_hidden_states, added_cond=None):
    """UNet2DConditionModel.forward up to and including the mid block (what ControlNets don't feed).

    Returns ``(skips, mid_sample, temb)``; ``skips`` are the down-block outputs that the up blocks
    take as skip connections, before the ControlNet residuals are added.
    """
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond or {})
    if aug is not None:
        emb = emb + aug
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(encoder_hidden_states, added_cond or {})
    sample = unet.conv_in(sample)
    skips = (sample,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            sample, res = block(hidden_states=sample, temb=emb)
        skips += res
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            sample = unet.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            sample = unet.mid_block(sample, emb)
    return skips, sample, emb


def unet_up(unet, skips, down_residuals, mid_sample, mid_residual, temb, encoder_hidden_states):
    """The rest of the forward: add the residuals, run the up blocks and the output head.

    Up-sampling sizes are always taken from the skips, so any latent size works."""
    if down_residuals is not None:
        skips = tuple(s + r for s, r in zip(skips, down_residuals))
        mid_sample = mid_sample + mid_residual
    sample = mid_sample
    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        res, skips = skips[-n:], skips[:-n]
        size = skips[-1].shape[2:] if i < len(unet.up_blocks) - 1 else None
        if getattr(block, "has_cross_attention", False):
            sample = block(
                hidden_states=sample, temb=temb, res_hidden_states_tuple=res,
                encoder_hidden_states=encoder_hidden_states, upsample_size=size,
            )
        else:
            sample = block(hidden_states=sample, temb=temb, res_hidden_states_tuple=res, upsample_size=size)
    if unet.conv_norm_out is not None:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)
