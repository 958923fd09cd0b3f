# An arm64 worker (CAX): nothing but the shared configuration.
{ ... }:
{ }
