"""Building blocks: embeddings, implicit generators, critics, conditional flows, a conditional VAE
and score-function gradient estimators. All are ``nn.Module``s with buffers for constants, so
``.to(device)`` moves them whole."""

from .critics import Critic
from .embeddings import CausalConvEmbedding, ContextNet, DeepSets, Flatten, GRUEmbedding, LinearResidual, ResidualMLP, Standardize
from .flows import (FLOWS, ActNorm, FlowDistribution, LULinear, build_flow, draw, flow_log_prob, inverted_layers,
                    short_softmax, widened)
from .generators import ConsistencyGenerator, DistilledGenerator, FlowMatchingGenerator, ImplicitGenerator, ScoreGenerator
from .score_function import LearnedBaseline, MovingAverageBaseline, leave_one_out_baseline, score_function_surrogate
from .vae import ConditionalVAE

__all__ = [
    "Critic", "CausalConvEmbedding", "ContextNet", "DeepSets", "Flatten", "GRUEmbedding", "LinearResidual", "ResidualMLP", "Standardize",
    "FLOWS", "ActNorm", "FlowDistribution", "LULinear", "build_flow", "draw", "flow_log_prob", "inverted_layers",
    "short_softmax", "widened",
    "ImplicitGenerator",
    "FlowMatchingGenerator", "ScoreGenerator", "ConsistencyGenerator", "DistilledGenerator",
    "LearnedBaseline", "MovingAverageBaseline", "leave_one_out_baseline", "score_function_surrogate",
    "ConditionalVAE",
]
