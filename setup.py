"""Package discovery for crossfed's layout (everything else is in pyproject.toml).

The design card's top-level folders (server/, client/, common/, protos/) are subpackages of
one import namespace ``crossfed``; setuptools needs every subpackage listed, so collect them.
"""

from setuptools import find_packages, setup

ROOTS = {
    "crossfed": "crossfed",
    "crossfed.server": "server",
    "crossfed.client": "client",
    "crossfed.common": "common",
    "crossfed.v1": "protos/crossfed/v1",
}

packages: list[str] = []
package_dir: dict[str, str] = {}
for name, folder in ROOTS.items():
    packages.append(name)
    package_dir[name] = folder
    for sub in find_packages(folder):
        packages.append(f"{name}.{sub}")
        package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={
        "crossfed.v1": ["*.proto", "*.pyi"],
        "crossfed.common.model": ["weights/*.safetensors"],  # pretrained default image CNN
    },
)
