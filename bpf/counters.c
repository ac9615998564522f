/* SPDX-License-Identifier: Apache-2.0 */
/*
 * counters.c - the per-node counters every hook bumps. A .c file joined into
 * the compile unit rather than a header, because bcc rewrites map accesses
 * (`counters.lookup`) only in the unit's main text.
 */

static __always_inline void mesh_count(int which)
{
	__u32 key = which;
	__u64 *value = counters.lookup(&key);

	if (value)
		*value += 1; /* per-CPU slot: no atomic needed */
}
