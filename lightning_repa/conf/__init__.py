"""The Hydra app's config groups (SPEC section 11), shipped inside the package.

Importing this package registers the structured configs (``lightning_repa.apps.hydra_config``), so
``hydra.initialize_config_module(config_module="lightning_repa.conf")`` composes on its own.
"""

import lightning_repa.apps.hydra_config  # noqa: F401  (ConfigStore schemas and resolvers)
