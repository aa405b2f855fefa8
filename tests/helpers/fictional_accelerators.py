"""Accelerators the package does not ship, for tests to register (ACCELERATORS.registered) and
see picked up by everything that reads the table: a TPU generation whose slices are named
'v9x-N' (chips, single-host up to 8) and a GPU whose device_kind carries its memory."""

from big_pretrain.accelerators import GIB, Accelerator, SliceRules

V9X = Accelerator(
    'v9x', 'TPU v9x', 'tpu', ('TPU v9x',), 64 * GIB, 2000e12, 2000e12, 'a test',
    hbm_bandwidth=4000e9, ici_bandwidth=800e9, dcn_bandwidth=25e9,
    slices=SliceRules(('v9x',), 'v9x-16', False, 2, 'v9x', 256, 'v2-alpha-tpuv9x',
                      single_host_max_chips=8))

Z100 = Accelerator('z100', 'NVIDIA Z100', 'gpu', ('NVIDIA Z100 192GB HBM4',), 192 * GIB,
                   3000e12, 1500e12, 'a test', kind_has=('z100',))
