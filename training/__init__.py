"""Training jobs, data, configs, checkpoints and evaluation."""

from autoencoder.hardware import configure_cpu

configure_cpu()  # before any kernel is built: some VMs advertise AMX that traps
