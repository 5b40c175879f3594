"""Stage 2 and generation: text-conditioned latent diffusion (built in later milestones)."""

from autoencoder.hardware import configure_cpu

configure_cpu()  # before any kernel is built: some VMs advertise AMX that traps
