// The digest of the sources this library was built from (metanet_jax/kernels/build.py sets
// it): metanet_jax.kernels refuses a library built from other sources than the ones present.
#ifndef METANET_SOURCE_DIGEST
#define METANET_SOURCE_DIGEST "unknown"
#endif

extern "C" const char* MetanetSourceDigest() { return METANET_SOURCE_DIGEST; }
