from titan_flow.config.job_config import JobConfig
from titan_flow.config.manager import ConfigError, build_job_config, to_dict

__all__ = ["JobConfig", "ConfigError", "build_job_config", "to_dict"]
