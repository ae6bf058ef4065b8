// The digest of the sources this library was built from (metanet_jax/kernels/build.py sets
// it): metanet_jax.kernels refuses a library built from other sources than the ones present.
// The target flags it was built with (-march=native unless overridden): the build rebuilds a
// library whose flags differ from the ones asked for.
#ifndef METANET_SOURCE_DIGEST
#define METANET_SOURCE_DIGEST "unknown"
#endif
#ifndef METANET_TARGET_FLAGS
#define METANET_TARGET_FLAGS "unknown"
#endif

extern "C" const char* MetanetSourceDigest() { return METANET_SOURCE_DIGEST; }
extern "C" const char* MetanetTargetFlags() { return METANET_TARGET_FLAGS; }
