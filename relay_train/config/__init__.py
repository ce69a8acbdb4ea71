"""The training config: SimpleTuner's keys, parsed once at the edge into a typed model.

The package's face is `load_config`, `TrainConfig` and `ConfigError`; the modules behind it:
- schema: TrainConfig, its fields and their cross-field rules;
- files: the files a config points at (LyCORIS config, multidatabackend.json, webhook.json);
- compat: SimpleTuner's names: aliases, refusals, mappings;
- notes: what a resolved config tells the user at start-up;
- overrides: `--set KEY=VALUE` and config keys given as flags.
"""

from relay_train.config.schema import (
    KEY_ALIASES,
    USER_KEYS,
    ConfigError,
    DataBackendConfig,
    LycorisConfig,
    TrainConfig,
    WebhookConfig,
    canonical_key,
    load_config,
    parse_config,
    skip_layer_guidance,
)

__all__ = [
    "KEY_ALIASES", "USER_KEYS", "ConfigError", "DataBackendConfig", "LycorisConfig", "TrainConfig", "WebhookConfig",
    "canonical_key", "load_config", "parse_config", "skip_layer_guidance",
]
