"""Helpers the tests share: bundles (:mod:`.bundles`), real daemons on free loopback ports (:mod:`.servers`;
ports and process handling come from :mod:`splitinfer.daemons`), and in-process fakes of the cloud client
(:mod:`.fakes`). Test modules import from here, never from one another."""
