//! `#[derive(Persist)]` for `rvm-collections`.
//!
//! The derive accepts a struct with named or tuple fields that is
//! `#[repr(C)]` (or `#[repr(transparent)]`), so its layout is the same for
//! every compiler that reads the heap later. It emits:
//! - a use of `<F as Persist>` for every field type `F` (a field that
//!   points into volatile memory, a reference, a `Box`, a `Vec`, fails to
//!   compile), and a bound `T: Persist` for every type parameter;
//! - a compile-time check that the fields' sizes add up to the struct's
//!   size (no padding: no uninitialised byte ever reaches the log);
//! - the layout fingerprint: a hash of the size, the alignment, and each
//!   field's offset and fingerprint;
//! - `LAYOUT_ID` (the same hash over the fields' layout ids, which stop
//!   at pointers), `OWNS_BLOCKS` and `describe` (the fields that hold
//!   pointers, by offset, for the tracer);
//! - `Plain` when every field is `Plain` (behind a higher-ranked bound, so
//!   a struct holding a collection is simply not `Plain`).

use proc_macro::TokenStream;
use quote::quote;
use syn::{parse_macro_input, Data, DeriveInput, Fields};

/// Derives `rvm_collections::Persist` (see the crate docs).
#[proc_macro_derive(Persist)]
pub fn derive_persist(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(t) => t.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

fn expand(input: &DeriveInput) -> syn::Result<proc_macro2::TokenStream> {
    let name = &input.ident;
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new_spanned(
            &input.ident,
            "#[derive(Persist)] supports structs only (an enum's invalid discriminants would be undefined behaviour \
             after damage; wrap a u8 or u32 instead)",
        ));
    };
    let mut stable = false;
    for attr in &input.attrs {
        if attr.path().is_ident("repr") {
            attr.parse_nested_meta(|m| {
                if m.path.is_ident("C") || m.path.is_ident("transparent") {
                    stable = true;
                }
                Ok(())
            })?;
        }
    }
    if !stable {
        return Err(syn::Error::new_spanned(
            &input.ident,
            "#[derive(Persist)] needs #[repr(C)] (or #[repr(transparent)]): the default Rust layout may change \
             between compiler versions, and the heap outlives the program",
        ));
    }
    let (members, types): (Vec<proc_macro2::TokenStream>, Vec<&syn::Type>) = match &data.fields {
        Fields::Named(f) => f
            .named
            .iter()
            .map(|f| {
                let id = f.ident.as_ref().expect("named field");
                (quote!(#id), &f.ty)
            })
            .unzip(),
        Fields::Unnamed(f) => f
            .unnamed
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let idx = syn::Index::from(i);
                (quote!(#idx), &f.ty)
            })
            .unzip(),
        Fields::Unit => (Vec::new(), Vec::new()),
    };
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let mut where_clause = where_clause.cloned().unwrap_or_else(|| syn::parse_quote!(where));
    let mut plain_where = where_clause.clone();
    // Bounds on the type parameters, not on the field types: a type that
    // points at itself (`next: Option<PBox<Node>>`) would make a bound on
    // its field type a cycle. The fields are still required to be
    // `Persist`: the constants below use their `Persist` items.
    let krate = collections_path();
    for p in input.generics.type_params() {
        let id = &p.ident;
        where_clause.predicates.push(syn::parse_quote!(#id: #krate::Persist));
    }
    for ty in &types {
        // Behind a higher-ranked bound, a field type that is not `Plain`
        // makes the impl not apply instead of failing to compile: a
        // struct holding a collection is `Persist` but not `Plain`.
        plain_where.predicates.push(syn::parse_quote!(for<'__rvm_plain> #ty: #krate::persist::Plain));
    }
    Ok(quote! {
        // SAFETY: every field is `Persist` (the constants use each field's
        // `Persist` items, which fails to compile otherwise), the layout is
        // #[repr(C)] or #[repr(transparent)], and the `FINGERPRINT` below
        // fails to compile if the fields do not fill the struct (padding).
        unsafe impl #impl_generics #krate::Persist for #name #ty_generics #where_clause {
            const FINGERPRINT: u64 = {
                let fields = 0usize #( + ::core::mem::size_of::<#types>() )*;
                assert!(
                    fields == ::core::mem::size_of::<Self>(),
                    "#[derive(Persist)]: the struct has padding bytes (reorder the fields, or add explicit padding fields)"
                );
                let mut h = #krate::persist::fingerprint_start(
                    ::core::mem::size_of::<Self>(),
                    ::core::mem::align_of::<Self>(),
                );
                #(
                    h = #krate::persist::fingerprint_mix(h, ::core::mem::offset_of!(Self, #members) as u64);
                    h = #krate::persist::fingerprint_mix(h, <#types as #krate::Persist>::FINGERPRINT);
                )*
                h
            };

            const LAYOUT_ID: u64 = {
                let mut h = #krate::persist::fingerprint_start(
                    ::core::mem::size_of::<Self>(),
                    ::core::mem::align_of::<Self>(),
                );
                #(
                    h = #krate::persist::fingerprint_mix(h, ::core::mem::offset_of!(Self, #members) as u64);
                    h = #krate::persist::fingerprint_mix(h, <#types as #krate::Persist>::LAYOUT_ID);
                )*
                h
            };

            const OWNS_BLOCKS: bool = false #( || <#types as #krate::Persist>::OWNS_BLOCKS )*;

            fn describe(shapes: &mut #krate::shape::Shapes) -> #krate::shape::ShapeId {
                if !<Self as #krate::Persist>::OWNS_BLOCKS {
                    return shapes.plain::<Self>();
                }
                shapes.define::<Self>(|shapes| {
                    let mut fields = ::std::vec::Vec::new();
                    #(
                        if <#types as #krate::Persist>::OWNS_BLOCKS {
                            fields.push((
                                ::core::mem::offset_of!(Self, #members) as u64,
                                <#types as #krate::Persist>::describe(shapes),
                            ));
                        }
                    )*
                    #krate::shape::Kind::Struct(fields)
                })
            }
        }

        // SAFETY: every field owns no heap block (the bounds above).
        unsafe impl #impl_generics #krate::persist::Plain for #name #ty_generics #plain_where {}
    })
}

/// The path of the typed layer in the crate being compiled: the
/// `rvm-collections` crate if it depends on it (under any name), else the
/// facade's `rvm::collections` (a program that depends on `rvm` alone, as
/// README's example does: `::rvm_collections` does not resolve there), else
/// `::rvm_collections`.
fn collections_path() -> proc_macro2::TokenStream {
    use proc_macro_crate::{crate_name, FoundCrate};
    let ident = |name: &str| proc_macro2::Ident::new(name, proc_macro2::Span::call_site());
    match crate_name("rvm-collections") {
        // Its own tests and doc tests (the library itself derives nothing).
        Ok(FoundCrate::Itself) => return quote!(::rvm_collections),
        Ok(FoundCrate::Name(name)) => {
            let name = ident(&name);
            return quote!(::#name);
        }
        Err(_) => {}
    }
    match crate_name("rvm") {
        Ok(FoundCrate::Itself) => quote!(::rvm::collections),
        Ok(FoundCrate::Name(name)) => {
            let name = ident(&name);
            quote!(::#name::collections)
        }
        Err(_) => quote!(::rvm_collections),
    }
}
