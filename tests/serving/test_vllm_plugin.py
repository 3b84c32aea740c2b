"""hubc's vLLM plugin is registered where vLLM looks for plugins, and registering it is harmless anywhere."""

from __future__ import annotations

from importlib.metadata import entry_points


def test_plugin_is_registered_for_vllm_and_reentrant():
    found = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "hubc"]
    assert [ep.value for ep in found] == ["serving.vllm_plugin:register"]
    register = found[0].load()
    register()
    register()  # vLLM may load plugins more than once per process
