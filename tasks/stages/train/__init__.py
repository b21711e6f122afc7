"""Stage: training, in this process or under torchrun (its rank, launcher and worker import no other stage)."""
