"""Test helpers shared by every suite (throwaway servers, launchers)."""
