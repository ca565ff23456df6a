"""The floor for a Hydra launcher: `@hydra.main` on hydralm's config tree and schema, and nothing
else. bench/startup.py times `--cfg job` of this against `python -m launcher --cfg job`."""

import hydra

import launcher.schema  # noqa: F401  (registers the schema, as launcher/cli/app.py does)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg) -> None:
    pass


if __name__ == "__main__":
    main()
