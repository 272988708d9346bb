using System.Text.Json;
using System.Text.Json.Serialization;
using System.Text.Json.Serialization.Metadata;

namespace FineTune.Domain;

/// <summary>The one JSON shape of our types, in jsonb columns and on the wire: camelCase, enums as lowercase strings.</summary>
public static class DomainJson
{
    public static readonly JsonSerializerOptions Options = Create();

    /// <summary>Strict options for reading client input: unknown fields, missing required values and nulls for
    /// non-nullable members are errors (each a <see cref="JsonException"/> naming the JSON path).</summary>
    public static readonly JsonSerializerOptions Strict = Create(strict: true);

    public static JsonSerializerOptions Create(bool strict = false)
    {
        var o = new JsonSerializerOptions(JsonSerializerDefaults.Web)
        {
            DefaultIgnoreCondition = JsonIgnoreCondition.Never,
            AllowOutOfOrderMetadataProperties = true,
            Converters = { new JsonStringEnumConverter(JsonNamingPolicy.SnakeCaseLower, allowIntegerValues: false) },
        };
        // MethodSpec.Type is [JsonIgnore] on the abstract base, but the records' overrides do not inherit the attribute,
        // and a "type" property clashes with the discriminator; computed get-only values (LoraMethod.Scaling) are not
        // options either: a method's JSON is exactly its settable options plus the discriminator.
        o.TypeInfoResolver = new DefaultJsonTypeInfoResolver
        {
            Modifiers =
            {
                ti =>
                {
                    if (!ti.Type.IsAssignableTo(typeof(Methods.MethodSpec)) || ti.Kind != JsonTypeInfoKind.Object) return;
                    for (var i = ti.Properties.Count - 1; i >= 0; i--)
                        if (ti.Properties[i].Name == "type" || ti.Properties[i].Set is null) ti.Properties.RemoveAt(i);
                },
            },
        };
        if (strict)
        {
            o.UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow;
            o.RespectRequiredConstructorParameters = true;
            o.RespectNullableAnnotations = true;
            o.NumberHandling = JsonNumberHandling.Strict;
        }
        o.MakeReadOnly();
        return o;
    }
}
