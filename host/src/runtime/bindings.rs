//! The only place `bindgen!` runs: host-side bindings of `wit/handler.wit`.

wasmtime::component::bindgen!({
    world: "handler",
    path: "../wit",
    imports: { default: async },
    exports: { default: async },
});
