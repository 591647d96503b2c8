"""Samplers as data: per-step coefficient tables built on the host, one generic update on the device.

A request names a sampler (euler, ddim, dpmpp_2m, lcm) and a timestep spacing or explicit timesteps;
`tables.py` turns that, with the model's scheduler config, into a table with one row per step and one
column per name in `update.COEFFICIENTS`, reproducing the diffusers scheduler of that name as built with
`from_config` from the model's own config. `update.py` is the only arithmetic the device runs for every
sampler, so slots with different samplers share one compiled step. `choices.py` says which sampler can
use which spacing and checks explicit timesteps; `book.py` keeps the tables a server has built.
"""
