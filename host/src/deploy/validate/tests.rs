//! `validate` on inputs built here: not wasm, a core module, components
//! that do not implement the world. (Real handler components are validated
//! by the end-to-end deploy tests.)

use wasm_encoder::{
    Alias, CanonicalFunctionSection, CanonicalOption, CodeSection, Component,
    ComponentAliasSection, ComponentExportKind, ComponentExportSection, ComponentImportSection,
    ComponentTypeRef, ComponentTypeSection, ComponentValType, ExportKind, ExportSection, Function,
    FunctionSection, InstanceSection, InstanceType, MemorySection, MemoryType, Module, ModuleArg,
    ModuleSection, PrimitiveValType, TypeBounds, TypeSection, ValType,
};

use super::*;

/// One runtime for every test of the file (building one sets up the pool).
fn runtime() -> &'static Runtime {
    static RUNTIME: std::sync::OnceLock<Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| Runtime::new(None).expect("runtime"))
}

fn refusal(bytes: &[u8]) -> String {
    validate(runtime(), bytes).expect_err("refused").to_string()
}

#[test]
fn empty_text_and_core_modules_are_refused_by_what_they_are() {
    assert_eq!(
        refusal(b""),
        "not a WebAssembly component: the file is empty"
    );
    assert_eq!(
        refusal(b"(component)\n"),
        "not a WebAssembly component: it is text, not a binary WebAssembly file (no \\0asm header)"
    );
    assert!(matches!(
        validate(runtime(), b"\0asm\x01\0\0\0"),
        Err(DeployError::CoreModule)
    ));
    assert!(
        refusal(b"\0asm\x01\0\0\0")
            .contains("not a component: build the handler for wasm32-wasip2")
    );
    assert!(refusal(b"\0asm\x0d").contains("ends inside the WebAssembly header"));
}

#[test]
fn a_truncated_component_is_malformed() {
    let mut bytes = b"\0asm\x0d\0\x01\0".to_vec();
    bytes.extend_from_slice(&[0x0a, 0x7f]); // an import section longer than the file
    assert!(matches!(
        validate(runtime(), &bytes),
        Err(DeployError::Malformed(_))
    ));
}

#[test]
fn a_component_without_handle_names_the_missing_export() {
    let empty = Component::new().finish();
    assert_eq!(
        refusal(&empty),
        "the component does not implement hookmesh:handler/handler: it does not export `handle` (exports: none)"
    );
}

/// A component whose `handle` is `func(event: event) -> result<_,
/// handler-error>` with a wrong `event` (one field, `id: u32`) and a
/// `handler-error` with one case, re-exported from an import, and that
/// imports `wasi:http/incoming-handler` (serving HTTP, which handlers do
/// not).
fn wrong_shapes() -> Vec<u8> {
    let mut component = Component::new();
    let mut types = ComponentTypeSection::new();
    types
        .defined_type()
        .record([("id", ComponentValType::Primitive(PrimitiveValType::U32))]); // 0
    component.section(&types);
    let mut imports = ComponentImportSection::new();
    imports.import("event", ComponentTypeRef::Type(TypeBounds::Eq(0))); // type 1
    component.section(&imports);
    let mut types = ComponentTypeSection::new();
    types.defined_type().variant([(
        "transient",
        Some(ComponentValType::Primitive(PrimitiveValType::String)),
    )]); // 2
    component.section(&types);
    let mut imports = ComponentImportSection::new();
    imports.import("handler-error", ComponentTypeRef::Type(TypeBounds::Eq(2))); // type 3
    component.section(&imports);
    let mut types = ComponentTypeSection::new();
    types
        .defined_type()
        .result(None, Some(ComponentValType::Type(3))); // 4
    types
        .function()
        .params([("event", ComponentValType::Type(1))])
        .result(Some(ComponentValType::Type(4))); // 5
    types.instance(&InstanceType::new()); // 6
    component.section(&types);
    let mut imports = ComponentImportSection::new();
    imports.import("handle-impl", ComponentTypeRef::Func(5));
    imports.import(
        "wasi:http/incoming-handler@0.2.0",
        ComponentTypeRef::Instance(6),
    );
    component.section(&imports);
    // The core module: `f: (i32) -> i32` returning a pointer into `memory`.
    let mut module = Module::new();
    let mut core_types = TypeSection::new();
    core_types.ty().function([ValType::I32], [ValType::I32]);
    module.section(&core_types);
    let mut functions = FunctionSection::new();
    functions.function(0);
    module.section(&functions);
    let mut memories = MemorySection::new();
    memories.memory(MemoryType {
        minimum: 1,
        maximum: None,
        memory64: false,
        shared: false,
        page_size_log2: None,
    });
    module.section(&memories);
    let mut core_exports = ExportSection::new();
    core_exports.export("f", ExportKind::Func, 0);
    core_exports.export("memory", ExportKind::Memory, 0);
    module.section(&core_exports);
    let mut code = CodeSection::new();
    let mut body = Function::new([]);
    body.instructions().i32_const(0).end();
    code.function(&body);
    module.section(&code);
    component.section(&ModuleSection(&module));
    let mut instances = InstanceSection::new();
    instances.instantiate(0, Vec::<(&str, ModuleArg)>::new());
    component.section(&instances);
    let mut aliases = ComponentAliasSection::new();
    aliases.alias(Alias::CoreInstanceExport {
        instance: 0,
        kind: ExportKind::Func,
        name: "f",
    });
    aliases.alias(Alias::CoreInstanceExport {
        instance: 0,
        kind: ExportKind::Memory,
        name: "memory",
    });
    component.section(&aliases);
    let mut canon = CanonicalFunctionSection::new();
    canon.lift(0, 5, [CanonicalOption::UTF8, CanonicalOption::Memory(0)]); // func 1
    component.section(&canon);
    let mut exports = ComponentExportSection::new();
    exports.export("handle", ComponentExportKind::Func, 1, None);
    component.section(&exports);
    component.finish()
}

#[test]
fn a_wrong_handle_and_foreign_imports_are_each_named() {
    let problems = match validate(runtime(), &wrong_shapes()) {
        Err(DeployError::NotAHandler(problems)) => problems,
        other => panic!("refused as not a handler, not {other:?}"),
    };
    let expected = [
        "`handle`'s event field `id` is u32, not option<string>",
        "`handle`'s event lacks the field `payload` (list<u8>)",
        "`handle`'s handler-error lacks the case `needs-human` (string)",
        "it imports a function `handle-impl`; handlers may import only interfaces",
        "it imports `wasi:http/incoming-handler@0.2.0`, but hookmesh provides only wasi:http/outgoing-handler",
    ];
    for needle in expected {
        assert!(
            problems.iter().any(|p| p.starts_with(needle)),
            "{needle:?} not among {problems:#?}"
        );
    }
    assert!(
        problems.iter().all(|p| !p.contains("does not export")),
        "{problems:#?}"
    );
    let message = DeployError::NotAHandler(problems).to_string();
    assert!(
        message.starts_with(
            "the component does not implement hookmesh:handler/handler:\n  - `handle`'s event field `id` is u32, not option<string>\n  - "
        ),
        "{message}"
    );
}

#[test]
fn imports_the_host_provides_are_allowed() {
    assert!(import_allowed("hookmesh:handler/state@0.1.0").is_ok());
    assert!(import_allowed("hookmesh:handler/state@0.2.0").is_ok());
    assert!(import_allowed("wasi:io/streams@0.2.6").is_ok());
    assert!(import_allowed("wasi:cli/environment@0.2.0").is_ok());
    assert!(import_allowed("wasi:http/outgoing-handler@0.2.12").is_ok());
    assert!(import_allowed("wasi:http/types@0.2.4").is_ok());
    assert_eq!(
        import_allowed("hookmesh:handler/state@0.3.0").expect_err("other version"),
        "but this host implements hookmesh:handler@0.2.0 and @0.1.0, not @0.3.0"
    );
    assert!(import_allowed("wasi:http/outgoing-handler@0.3.0").is_err());
    assert!(
        import_allowed("wasi:http/incoming-handler@0.2.12")
            .expect_err("serving")
            .contains("it does not serve them")
    );
    assert!(
        import_allowed("hookmesh:handler/secrets@0.1.0")
            .expect_err("no such interface")
            .starts_with("but hookmesh:handler has no interface `secrets`")
    );
    assert!(import_allowed("wasi:io/streams@0.3.0").is_err());
    assert!(import_allowed("acme:payments/api").is_err());
}

#[test]
fn the_world_version_comes_from_the_hookmesh_imports() {
    let mut problems = Vec::new();
    assert_eq!(
        world_of(
            &["wasi:io/streams@0.2.6", "hookmesh:handler/types@0.1.0"],
            &mut problems
        ),
        "0.1.0"
    );
    assert_eq!(
        world_of(&["hookmesh:handler/log@0.2.0"], &mut problems),
        "0.2.0"
    );
    assert_eq!(
        world_of(&[], &mut problems),
        "0.2.0",
        "the newest by default"
    );
    assert!(problems.is_empty(), "{problems:?}");
    world_of(
        &["hookmesh:handler/types@0.2.0", "hookmesh:handler/log@0.1.0"],
        &mut problems,
    );
    assert_eq!(
        problems,
        [
            "it imports interfaces of hookmesh:handler@0.2.0 and @0.1.0: a component targets one version"
        ]
    );
}
