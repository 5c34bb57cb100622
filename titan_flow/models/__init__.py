from titan_flow.models.registry import ModelSpec, get_model_spec

__all__ = ["ModelSpec", "get_model_spec"]
