# Copyright: Keyway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The attributes every keyway.ipsec module documents (as community.crypto does)."""

from __future__ import annotations


class ModuleDocFragment:
    # What check_mode and diff_mode mean; each module says its support.
    DOCUMENTATION = r"""
options: {}
attributes:
  check_mode:
    description:
      Can run in check mode and return a prediction of what would change, without
      changing the host.
  diff_mode:
    description: Returns details on what has changed (or would change in check mode), in diff mode.
  platform:
    description: Target operating system and kernel.
    support: full
    platforms: posix
"""

    # For modules that only read.
    INFO_MODULE = r"""
options: {}
attributes:
  check_mode:
    support: full
    details: This module only reads.
  diff_mode:
    support: N/A
    details: This module only reads.
"""
