"""The training config: SimpleTuner's keys, parsed once at the edge into a typed model.

The package's face is `load_config`, `TrainConfig` and `ConfigError`; the modules behind it:
- schema: TrainConfig, its fields and the rules between them;
- files: the files a config points at (LyCORIS config, multidatabackend.json, webhook.json);
- problems: how a problem is found and worded, for every config Relay reads (the cluster config too);
- load: reading a config.json (and overrides) into a TrainConfig;
- compat: SimpleTuner's names: aliases, refusals, mappings;
- notes: what a resolved config tells the user at start-up;
- overrides: `--set KEY=VALUE` and config keys given as flags.
"""

from relay_train.config.files import DataBackendConfig, LycorisConfig, WebhookConfig
from relay_train.config.load import load_config, parse_config
from relay_train.config.problems import ConfigError
from relay_train.config.schema import KEY_ALIASES, USER_KEYS, TrainConfig, canonical_key, skip_layer_guidance

__all__ = [
    "KEY_ALIASES",
    "USER_KEYS",
    "ConfigError",
    "DataBackendConfig",
    "LycorisConfig",
    "TrainConfig",
    "WebhookConfig",
    "canonical_key",
    "load_config",
    "parse_config",
    "skip_layer_guidance",
]
