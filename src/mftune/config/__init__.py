"""The run configuration: loaded from YAML or JSON with `key.path=value` overrides, validated at load time.

The schema (`schema`) forbids unknown keys, spells every choice as a closed `Literal` and documents every
field, from which `docs/config.md` is generated (`reference`). Mistakes surface at load time (`load`) as
one `ConfigError` (`errors`) that names the file, each dotted path, the bad value and the allowed values,
and suggests the nearest valid key. An MFTCoder train config is translated by one mapping (`mftcoder`).
"""

from mftune.config.errors import ConfigError
from mftune.config.load import (
    config_reference_markdown,
    config_to_dict,
    dump_config,
    load_config,
    validate_config,
)
from mftune.config.schema import (
    LOSS_ALIASES,
    CobaConfig,
    Config,
    DataConfig,
    EarlyStopping,
    FinetuneConfig,
    LoraConfig,
    ModelConfig,
    QloraConfig,
    RoleMarkers,
    TaskConfig,
    TemplateConfig,
    TrainConfig,
)

__all__ = [
    "LOSS_ALIASES",
    "CobaConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EarlyStopping",
    "FinetuneConfig",
    "LoraConfig",
    "ModelConfig",
    "QloraConfig",
    "RoleMarkers",
    "TaskConfig",
    "TemplateConfig",
    "TrainConfig",
    "config_reference_markdown",
    "config_to_dict",
    "dump_config",
    "load_config",
    "validate_config",
]
