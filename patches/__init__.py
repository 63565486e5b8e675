"""The few SGLang hooks AsyncTLS needs, one per file, registered through SGLang's HookRegistry by plugin.py."""
