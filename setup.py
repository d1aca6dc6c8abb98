"""Maps the three top-level folders into the `odyssey` namespace (see DESIGN.md, Layout)."""

from setuptools import find_packages, setup

PACKAGE_ROOTS = {
    "odyssey": "odyssey",
    "odyssey.pipelines": "pipelines",
    "odyssey.tokenizer": "tokenizer",
    "odyssey.kernels": "kernels",
}


def _packages() -> list[str]:
    names = []
    for name, folder in PACKAGE_ROOTS.items():
        names.append(name)
        names += [f"{name}.{sub}" for sub in find_packages(folder)]
    return names


setup(
    packages=_packages(),
    package_dir=PACKAGE_ROOTS,
    package_data={"odyssey.pipelines": ["*.yaml"], "odyssey": ["configs/*.yaml"]},
    include_package_data=True,
)
