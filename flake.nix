# nix build          the provider (crane, locked dependencies from Cargo.lock)
# nix flake check    clippy, fmt, the provider's tests (with nats-server from nixpkgs)
# nix develop        toolchain, nats-server, wit-deps, wasm-tools, cargo-nextest
#
# Checked here only with `nix-instantiate --parse` (see README): this workplace cannot fetch
# the flake's inputs.
{
  description = "keyvalue-inmemory: an in-memory key-value capability provider for wasmCloud 1.x";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";
    crane.url = "github:ipetkov/crane";
    flake-utils.url = "github:numtide/flake-utils";
    wit-deps = {
      url = "github:bytecodealliance/wit-deps/v0.5.0";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs = { self, nixpkgs, crane, flake-utils, wit-deps }:
    flake-utils.lib.eachDefaultSystem (system:
      let
        pkgs = nixpkgs.legacyPackages.${system};
        lib = pkgs.lib;
        craneLib = crane.mkLib pkgs;

        # Cargo's own sources plus the WIT files: the bindings are generated from wit/ at
        # compile time and the provider archive embeds the world.
        isWit = path: _type: lib.hasSuffix ".wit" path;
        src = lib.cleanSourceWith {
          src = ./.;
          name = "keyvalue-inmemory-source";
          filter = path: type: (isWit path type) || (craneLib.filterCargoSources path type);
        };

        commonArgs = {
          inherit src;
          pname = "keyvalue-inmemory";
          version = "0.1.0";
          strictDeps = true;
          cargoExtraArgs = "--locked --package keyvalue-inmemory";
        };
        cargoArtifacts = craneLib.buildDepsOnly commonArgs;

        provider = craneLib.buildPackage (commonArgs // {
          inherit cargoArtifacts;
          doCheck = false;
          meta.mainProgram = "keyvalue-inmemory";
        });
      in
      {
        packages.default = provider;
        packages.keyvalue-inmemory = provider;

        checks = {
          inherit provider;
          # The provider and the store crate it serves (store/).
          clippy = craneLib.cargoClippy (commonArgs // {
            inherit cargoArtifacts;
            cargoExtraArgs = "--locked --package keyvalue-inmemory --package keyvalue-store";
            cargoClippyExtraArgs = "--all-targets -- --deny warnings";
          });
          fmt = craneLib.cargoFmt { inherit src; };
          # The provider's and the store's tests; they start nats-server on loopback ports it
          # picks. The real-lattice test (e2e/) needs the archive `cargo xtask test` builds: run
          # it there.
          tests = craneLib.cargoNextest (commonArgs // {
            inherit cargoArtifacts;
            cargoExtraArgs = "--locked --package keyvalue-inmemory --package keyvalue-store";
            nativeCheckInputs = [ pkgs.nats-server ];
            NATS_SERVER_BIN = "${pkgs.nats-server}/bin/nats-server";
          });
        };

        devShells.default = craneLib.devShell {
          checks = self.checks.${system};
          packages = [
            pkgs.nats-server
            pkgs.wasm-tools
            pkgs.cargo-nextest
            pkgs.rust-analyzer
            wit-deps.packages.${system}.default
          ];
          NATS_SERVER_BIN = "${pkgs.nats-server}/bin/nats-server";
        };
      });
}
