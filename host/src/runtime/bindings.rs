//! The only place `bindgen!` runs: host-side bindings of the two versions
//! of the `hookmesh:handler` world the host links — `wit/handler.wit`
//! (0.2.0, what guests build against now) and `wit/0.1.0/handler.wit`
//! (frozen; its components keep running unchanged).

/// `hookmesh:handler@0.2.0`.
pub mod v0_2 {
    wasmtime::component::bindgen!({
        world: "handler",
        path: "../wit",
        imports: { default: async },
        exports: { default: async },
    });
}

/// `hookmesh:handler@0.1.0`.
pub mod v0_1 {
    wasmtime::component::bindgen!({
        world: "handler",
        path: "../wit/0.1.0",
        imports: { default: async },
        exports: { default: async },
    });
}
