"""sjd2-jax: Speculative Jacobi-Denoising Decoding for autoregressive text-to-image models, in JAX."""

from sjd2_jax.api import DEMO_MODEL, Model, load
from sjd2_jax.decode.generate import Generation, generate
from sjd2_jax.model.cache import KVCache
from sjd2_jax.model.config import ModelConfig
from sjd2_jax.sjd2.masks import MaskSpec, build_mask, training_mask, window_masks, window_positions
from sjd2_jax.sjd2.schedule import NoiseConfig, add_noise, alpha_sigma, denoise_step, predict_e0
from sjd2_jax.sjd2.standardize import EmbedStats, embedding_stats, standardize, unstandardize
from sjd2_jax.sjd2.timestep import timestep_embeddings
from sjd2_jax.training.batch import TrainBatchConfig, TrainingExample, build_training_batch
from sjd2_jax.training.loss import next_token_loss, sjd2_loss, training_loss

__all__ = [
    "DEMO_MODEL",
    "EmbedStats",
    "Generation",
    "KVCache",
    "MaskSpec",
    "Model",
    "ModelConfig",
    "NoiseConfig",
    "TrainBatchConfig",
    "TrainingExample",
    "add_noise",
    "alpha_sigma",
    "build_mask",
    "build_training_batch",
    "denoise_step",
    "embedding_stats",
    "generate",
    "load",
    "next_token_loss",
    "predict_e0",
    "sjd2_loss",
    "standardize",
    "timestep_embeddings",
    "training_loss",
    "training_mask",
    "unstandardize",
    "window_masks",
    "window_positions",
]
