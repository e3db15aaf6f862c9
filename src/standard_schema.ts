/**
 * The [Standard Schema](https://standardschema.dev) interface, so `fetchAsModel` accepts
 * Zod, Valibot, ArkType and any other validator that implements it, with no dependency.
 *
 * @module
 */

/** One issue reported by a validator. */
export interface StandardSchemaIssue {
  /** What is wrong. */
  readonly message: string;
  /** Where in the value. */
  readonly path?: ReadonlyArray<PropertyKey | { readonly key: PropertyKey }>;
}

/** The outcome of one validation. */
export type StandardSchemaResult<Output> =
  | { readonly value: Output; readonly issues?: undefined }
  | { readonly issues: ReadonlyArray<StandardSchemaIssue> };

/** A validator implementing Standard Schema v1. */
export interface StandardSchemaV1<Input = unknown, Output = Input> {
  /** The Standard Schema properties. */
  readonly "~standard": {
    /** Always 1. */
    readonly version: 1;
    /** The library that made the validator. */
    readonly vendor: string;
    /** Validates and converts a value. */
    readonly validate: (
      value: unknown,
    ) => StandardSchemaResult<Output> | Promise<StandardSchemaResult<Output>>;
    /** Type carriers, used only for inference. */
    readonly types?: { readonly input: Input; readonly output: Output } | undefined;
  };
}

/** The output type of a Standard Schema validator. */
export type InferOutput<S extends StandardSchemaV1> = NonNullable<
  S["~standard"]["types"]
>["output"];
