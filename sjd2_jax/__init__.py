"""sjd2-jax: Speculative Jacobi-Denoising Decoding for autoregressive text-to-image models, in JAX."""

from sjd2_jax.api import DEMO_MODEL, Model, load
from sjd2_jax.model.cache import KVCache
from sjd2_jax.model.config import ModelConfig
from sjd2_jax.decode.generate import Generation, generate
from sjd2_jax.training.loss import next_token_loss, sjd2_loss, training_loss
from sjd2_jax.sjd2.masks import MaskSpec, build_mask, training_mask, window_masks, window_positions
from sjd2_jax.sjd2.schedule import NoiseConfig, add_noise, alpha_sigma, denoise_step, predict_e0
from sjd2_jax.sjd2.standardize import EmbedStats, embedding_stats, standardize, unstandardize
from sjd2_jax.sjd2.timestep import timestep_embeddings
from sjd2_jax.training.batch import TrainBatchConfig, TrainingExample, build_training_batch

__all__ = [
    "DEMO_MODEL", "Model", "load", "KVCache", "ModelConfig", "generate", "Generation",
    "NoiseConfig", "add_noise", "alpha_sigma", "denoise_step", "predict_e0",
    "EmbedStats", "embedding_stats", "standardize", "unstandardize", "timestep_embeddings",
    "MaskSpec", "build_mask", "training_mask", "window_masks", "window_positions",
    "TrainBatchConfig", "TrainingExample", "build_training_batch",
    "next_token_loss", "sjd2_loss", "training_loss",
]
