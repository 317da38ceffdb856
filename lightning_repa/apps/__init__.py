"""The command-line apps, each a thin `@hydra.main` over a testable `run(cfg)`: `train`
(``lightning-repa-train``), `probe` (``lightning-repa-probe``), `precompute` (``lightning-repa-cache``);
`hydra_config` (the structured configs in Hydra's ConfigStore) and `runtime` (what they share).
May import everything."""
