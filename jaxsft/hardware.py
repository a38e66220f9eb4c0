"""Cloud TPU chips and slices: HBM and peak FLOPs per chip, slice names → compile-only devices, and
joining the other hosts of a multi-host job.

A slice is named as Cloud TPU names accelerator types (`v5e-8`, `v5litepod-16`, `v4-8`, `v5p-8`,
`v6e-8`: the number counts chips on v5e/v6e and TensorCores on v4/v5p, whose two cores per chip act
as one device) or as libtpu names topologies (`v5e:2x4`, `v4:2x2x1`, `v5p:2x2x2`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    libtpu_name: str  # prefix of libtpu topology names
    accelerator: str  # prefix of Cloud TPU accelerator types
    hbm_bytes: int
    peak_bf16_flops: float  # per chip, per second
    megacore: bool  # two TensorCores per chip run as one device
    ndim: int  # torus dimensions of a slice


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "v4", "v4", 32 * GiB, 275e12, megacore=True, ndim=3),
    "v5e": Chip("v5e", "v5e", "v5litepod", 16 * GiB, 197e12, megacore=False, ndim=2),
    "v5p": Chip("v5p", "v5", "v5p", 95 * GiB, 459e12, megacore=True, ndim=3),
    "v6e": Chip("v6e", "v6e", "v6e", 32 * GiB, 918e12, megacore=False, ndim=2),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p"}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice: `shape` chips along each torus dimension."""

    chip: Chip
    shape: tuple[int, ...]

    @property
    def num_chips(self) -> int:
        return math.prod(self.shape)

    @property
    def topology_name(self) -> str:
        return f"{self.chip.libtpu_name}:{'x'.join(map(str, self.shape))}"

    @property
    def accelerator_type(self) -> str:
        """The `--accelerator-type` of `gcloud compute tpus tpu-vm create`."""
        per_chip = 2 if self.chip.megacore else 1
        return f"{self.chip.accelerator}-{self.num_chips * per_chip}"

    @property
    def host_bounds(self) -> tuple[int, int, int]:
        """Chips per host: 2x2x1, except single-host v5e/v6e slices of up to 8 chips."""
        if self.chip.ndim == 2 and self.num_chips <= 8:
            return (*self.shape, 1)
        return (2, 2, 1)

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        """Torus wrap-around links: full cubes of 3D slices, 16-chip rows of 2D slices."""
        if self.chip.ndim == 3:
            return (min(self.shape) >= 4,) * 3
        return (self.shape[0] == 16, self.shape[1] == 16, False)

    def devices(self) -> list:
        """Compile-only devices of this slice, from libtpu; no TPU needs to be attached."""
        # libtpu reads these once, when it loads: compile-only use needs no metadata server, no real
        # workers, and may run beside another process holding libtpu.
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", self.accelerator_type)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(
            topology_name=self.topology_name, platform="tpu",
            chip_config_name="megacore" if self.chip.megacore else "default",
            chips_per_host_bounds=self.host_bounds, num_slices=1, wrap=self.wrap)
        return list(desc.devices)


def _shape_2d(chips: int) -> tuple[int, int]:
    a = 2 ** (int(math.log2(chips)) // 2)
    return a, chips // a


def _shape_3d(chips: int) -> tuple[int, int, int]:
    """Powers of two, filled as Cloud TPU does: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ..."""
    if chips == 4:
        return (2, 2, 1)
    dims = [2, 2, 2]
    i = 2
    while math.prod(dims) < chips:
        dims[i] *= 2
        i = (i - 1) % 3
    return tuple(sorted(dims))


def parse_slice(name: str) -> Slice:
    """`v5e-8` (Cloud TPU accelerator type) or `v5e:2x4` (libtpu topology) → Slice."""
    m = re.fullmatch(r"(v\d+[a-z]*)([:-])([\dx]+)", name.strip().lower())
    if not m:
        raise ValueError(f"cannot parse TPU slice {name!r}; use e.g. v5e-8, v4-8, v5p-8, v6e-8 or v5e:2x4")
    family, sep, size = m.groups()
    family = _ALIASES.get(family, family)
    if family not in CHIPS:
        raise ValueError(f"unknown TPU chip {family!r}; known: {', '.join(CHIPS)}")
    chip = CHIPS[family]
    if sep == ":":
        shape = tuple(int(d) for d in size.split("x"))
        if len(shape) != chip.ndim:
            raise ValueError(f"{chip.name} topologies have {chip.ndim} dimensions, got {name!r}")
        return Slice(chip, shape)
    count = int(size)
    chips = count // 2 if chip.megacore else count
    if chips < 1 or chips & (chips - 1) or (chip.megacore and (count % 2 or chips < 4)):
        raise ValueError(f"unsupported slice size {name!r}: {chip.name} slices here have a power-of-two "
                         f"number of chips{' (4 or more)' if chip.megacore else ''}")
    shape = _shape_3d(chips) if chip.ndim == 3 else _shape_2d(chips)
    return Slice(chip, shape)


def maybe_initialize_distributed() -> bool:
    """Call `jax.distributed.initialize()` for a multi-process job, before any other JAX call.

    Multi-process means: `JAX_COORDINATOR_ADDRESS` with `JAXSFT_NUM_PROCESSES` and `JAXSFT_PROCESS_ID`
    (explicit, as the tests start CPU processes), `JAXSFT_DISTRIBUTED=1` (set by `launch/tpu_vm.sh` on every TPU VM worker;
    JAX then finds the slice's coordinator and process ids itself), an explicit
    `JAX_COORDINATOR_ADDRESS`, or a SLURM / Open MPI job of more than one task. Returns whether it
    initialized.
    """
    import jax

    env = os.environ
    wanted = env.get("JAXSFT_DISTRIBUTED", "").lower() in ("1", "true", "yes")
    wanted |= "JAX_COORDINATOR_ADDRESS" in env
    wanted |= int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    if not wanted or jax.distributed.is_initialized():
        return False
    if "JAXSFT_NUM_PROCESSES" in env:  # explicit, e.g. several CPU processes on one machine
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAXSFT_NUM_PROCESSES"]),
                                   int(env["JAXSFT_PROCESS_ID"]))
    else:
        jax.distributed.initialize()
    if jax.process_index() != 0:  # the libraries' progress bars too: process 0 only, as ours
        import datasets
        import huggingface_hub

        datasets.disable_progress_bars()
        huggingface_hub.utils.disable_progress_bars()
    return True
