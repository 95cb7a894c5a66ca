"""Domain generalization with domain-specific BatchNorm (``convert(model, to="dsbn", domains=...)``):
routing batches to domains, the BN-Embedding ensemble for unseen domains, domain-pure batching."""
from .ensemble import BNEnsemble, mixture_weights, wasserstein_to_domains
from .routing import domain, domain_layers, domains_of, set_domain

__all__ = ["BNEnsemble", "domain", "set_domain", "domain_layers", "domains_of", "mixture_weights",
           "wasserstein_to_domains"]
